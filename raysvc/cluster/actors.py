"""Small facts about the Ray actor this code runs in, and about actors given by name."""

from __future__ import annotations

from typing import Any

NAMESPACE = "raysvc"  # the Ray namespace of every application's named actors


def actor(handle_or_name: Any) -> Any:
    """An actor handle, looked up by name if given one (an application's named actor, in
    the `raysvc` namespace)."""
    if isinstance(handle_or_name, str):
        import ray

        from raysvc.cluster.launch import NAMESPACE

        return ray.get_actor(handle_or_name, namespace=NAMESPACE)
    return handle_or_name


def was_restarted() -> bool:
    """Whether this process is an actor that Ray restarted (its state starts empty)."""
    import warnings

    import ray

    if not ray.is_initialized():
        return False
    with warnings.catch_warnings():  # Ray's own property uses its deprecated actor_id
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.get_runtime_context().was_current_actor_reconstructed
