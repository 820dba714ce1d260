"""Placeholder: being written."""


def swiglu(*args, **kwargs):
    raise NotImplementedError
