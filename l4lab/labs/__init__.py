"""Classroom labs: a student writes one piece of Llama 4, and a checker says whether it is right.

Each lab is a notebook in ``notebooks/labs/`` (the worked solutions are in ``notebooks/labs/solutions/``):
a short brief, then exercise cells whose function bodies read ``raise NotImplementedError``, each
followed by its check::

    from l4lab import labs

    def rms_norm(x, weight, eps):
        ...

    labs.check("1.1", rms_norm)  # ✓ 1.1 passed: 6 cases   (or what failed, and a hint)

:func:`check` runs the student's function on hidden, seeded cases (batch 1, odd lengths, sizes that
are not powers of two, a chunk size that does not divide the length, experts that receive no token...)
and compares every answer with l4lab's own implementation (``l4lab.ops``, ``l4lab.model``,
``l4lab.routing``). It never raises on a wrong answer: it returns a :class:`CheckResult` naming the
first case that failed, the expected and the received shapes or values, and a hint. When the answer
matches a typical mistake (rotate-half RoPE, a softmax router, a sliding window instead of chunks...)
the hint names that mistake. Exceptions raised by the student's function are caught and reported with
the case that triggered them and the line of the student's code that raised.

======================  =========================================================================
:func:`steps`           every step with a one-line description (``steps("2")``: one lab's)
:func:`check`           run a step's hidden cases on a function; returns a :class:`CheckResult`
:func:`case`            one case's inputs and expected output, to debug a failure by hand
:func:`hint`            a step's hints, one level at a time: the idea, the formula, where l4lab does it
:func:`train_tiny_moe`  lab 4's model: a tiny 8-expert Llama 4 trained briefly on the data mixture
                        (returns a :class:`TinyMoE`: model, held-out data, history)
======================  =========================================================================

The labs (``LABS``): 1 ``rmsnorm_rope``, 2 ``router_moe``, 3 ``chunked_attention``,
4 ``routing_experiment``, 5 ``irope_length``, 6 ``multimodal``, 7 ``expert_dispatch``. A step is named
``"<lab>.<step>"``, e.g. ``"1.3"`` (``"rmsnorm_rope.3"`` works too).

The package: ``core.py`` holds the machinery every lab shares (cases, typical mistakes, steps,
comparisons, the registry); each lab is one module, ``lab1_rmsnorm_rope.py`` to
``lab7_expert_dispatch.py``, holding its references, cases, typical mistakes and steps, and ending
with ``register_lab(...)``. A teacher adds a lab by adding such a module and importing it below.
"""

# the labs, in order: importing a lab's module registers its steps (a new lab: one more line here)
from l4lab.labs import (  # noqa: F401
    lab1_rmsnorm_rope,
    lab2_router_moe,
    lab3_chunked_attention,
    lab4_routing_experiment,
    lab5_irope_length,
    lab6_multimodal,
    lab7_expert_dispatch,
)
from l4lab.labs.core import LABS, CheckResult, case, check, hint, steps
from l4lab.labs.core import step_table as _steps_table  # noqa: F401  (the tests read every step)
from l4lab.labs.lab4_routing_experiment import TINY_MOE_CONFIG, TinyMoE, train_tiny_moe

__all__ = [
    "LABS",
    "TINY_MOE_CONFIG",
    "CheckResult",
    "TinyMoE",
    "case",
    "check",
    "hint",
    "steps",
    "train_tiny_moe",
]
