"""The engine on one device: paged KV pool, scheduler, model runner, sampler. No Ray."""
