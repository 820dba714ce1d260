"""Placeholder: being written."""


def attention(*args, **kwargs):
    raise NotImplementedError
