"""Placeholder: being written."""


def rope_qk_norm(*args, **kwargs):
    raise NotImplementedError
