"""Adapters loaded and unloaded while serving: vLLM's `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter` (off unless `allow_runtime_lora_updating`, as vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING: they let a caller make workers read a directory).

The router owns the fleet's adapter list (it loads a new adapter on every worker, or on
none when one refuses it, and pushes it to workers that join later); each ingress
replica keeps a copy for checking `model` and listing /v1/models, refreshed from the
router at most every `refresh_s` while requests come, and at once after a change made
through it. Another replica's change is therefore seen within `refresh_s`.
"""

from __future__ import annotations

import time
from typing import Any

from raysvc.cluster.messages import NoWorkers
from raysvc.serve.errors import APIError, bad_request
from raysvc.serve.planner import ModelFacts
from raysvc.serve.schema import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest


class LoRAAdmin:
    def __init__(self, facts: ModelFacts, client: Any, refresh_s: float = 2.0) -> None:
        self.facts = facts
        self.client = client  # a ClusterClient (its router, re-resolved after a restart)
        self.refresh_s = refresh_s
        self._refreshed = 0.0

    async def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._refreshed < self.refresh_s:
            return
        self._refreshed = now
        loras = await self.client.router.lora_modules.remote()
        if loras is not None:
            self.facts.loras = loras

    async def load(self, req: LoadLoRAAdapterRequest) -> str:
        if req.lora_name == self.facts.name:
            raise bad_request(f"lora_name: {req.lora_name!r} is the base model's name",
                              param="lora_name")
        try:
            await self.client.router.load_lora.remote(req.lora_name, req.lora_path)
        except NoWorkers:
            raise APIError(503, "no worker is ready to load the adapter on; retry shortly",
                           type="service_unavailable", retry_after=5) from None
        except ValueError as e:  # the name is taken, or a worker refused the directory
            raise bad_request(str(getattr(e, "cause", e)), param="lora_path") from None
        await self.refresh(force=True)
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    async def unload(self, req: UnloadLoRAAdapterRequest) -> str:
        try:
            await self.client.router.unload_lora.remote(req.lora_name)
        except KeyError:
            raise APIError(404, f"The lora adapter '{req.lora_name}' cannot be found.",
                           type="not_found_error", param="lora_name") from None
        await self.refresh(force=True)
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."
