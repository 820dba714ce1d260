"""Placeholder: being written."""


def route(*args, **kwargs):
    raise NotImplementedError


def routed_experts(*args, **kwargs):
    raise NotImplementedError
