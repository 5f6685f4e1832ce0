"""Reward functions for the reward tests; module-level so spawned workers can import them."""
import time


def exact(data_source, solution_str, ground_truth, extra_info=None):
    return float(solution_str.strip() == ground_truth)


def tricky(data_source, solution_str, ground_truth, extra_info=None):
    """Exact match, except for inputs that exercise each failure mode."""
    if solution_str == "boom":
        raise RuntimeError("reward exploded")
    if solution_str == "hang":
        time.sleep(60)
    if solution_str == "nan":
        return float("nan")
    if solution_str == "text":
        return "1.0"
    if solution_str == "dict":
        return {"score": 0.5, "acc": True}
    if solution_str == "nodict":
        return {"acc": 1.0}
    return exact(data_source, solution_str, ground_truth, extra_info)


def always_raise(data_source, solution_str, ground_truth, extra_info=None):
    raise ValueError(f"cannot grade {solution_str!r}")


def always_hang(data_source, solution_str, ground_truth, extra_info=None):
    time.sleep(600)


def slow_arithmetic(data_source, solution_str, ground_truth, extra_info=None):
    """The bundled task's grader, 50 ms an item: a step then lasts long enough to be interrupted inside."""
    from ibtpo_fast.tasks import compute_score

    time.sleep(0.05)
    return compute_score(data_source, solution_str, ground_truth, extra_info)


class RankFailure(BaseException):
    """Not an Exception: it passes the reward guard, as a fatal fault would."""


def fails_on_rank_1(data_source, solution_str, ground_truth, extra_info=None):
    """The bundled grader on rank 0; on rank 1 of a torchrun world, an error past the reward guard."""
    import os

    from ibtpo_fast.tasks import compute_score

    if os.environ.get("RANK") == "1":
        raise RankFailure("reward failed on rank 1")
    return compute_score(data_source, solution_str, ground_truth, extra_info)


def arithmetic_5ms(data_source, solution_str, ground_truth, extra_info=None):
    """The bundled task's grader at 5 ms an item, about what a math-verify grade takes: a round's grading
    then costs about what its decoding does."""
    from ibtpo_fast.tasks import compute_score

    time.sleep(0.005)
    return compute_score(data_source, solution_str, ground_truth, extra_info)
