"""Small builders for the objects the cores decide on: workers, models, cluster views, forecasts, samples.

Defaults describe the common case (a 10 GiB worker on node n0, a 1 GiB model); tests name only what matters
to them.
"""

from __future__ import annotations

from shared.messages import CopyState, DemandSample, Forecast, ModelCopy, ModelSpec, Outcome, WorkerState
from shared.policy.cluster import ClusterView

GB = 2**30


def copy(model: str, state: CopyState = CopyState.PREWARMED, weight_bytes: int = GB, in_flight: int = 0, *,
         worker_id: str = "w", kv_total_blocks: int | None = None, kv_target: int | None = None,
         made: Outcome | None = None, since_s: float = 0.0) -> ModelCopy:
    serving = state in (CopyState.ACTIVE, CopyState.DRAINING)
    return ModelCopy(model=model, state=state, weight_bytes=weight_bytes, in_flight=in_flight, since_s=since_s,
                     instance_id=f"{worker_id}-{model}" if serving else None, made=made,
                     kv_total_blocks=(100 if serving else 0) if kv_total_blocks is None else kv_total_blocks,
                     kv_target_free_blocks=kv_target)


def worker(wid: str, *copies: tuple | ModelCopy, budget: int = 10 * GB, kv: int = 0, reclaimable: int = 0,
           node: str = "n0", kv_cache: int = 0, batch_capacity: int = 32, heartbeat_s: float = 100.0,
           started_s: float = 0.0) -> WorkerState:
    """``copies``: ModelCopy objects or ``(model, state[, weight_bytes[, in_flight]])`` tuples."""
    built = [c if isinstance(c, ModelCopy) else copy(*c, worker_id=wid) for c in copies]
    return WorkerState(worker_id=wid, node=node, device=f"dev:{wid}", engine="sim", memory_budget_bytes=budget,
                       weight_bytes=sum(c.weight_bytes for c in built), kv_bytes=kv, reclaimable_bytes=reclaimable,
                       kv_cache_bytes=kv_cache, batch_capacity=batch_capacity, heartbeat_at_s=heartbeat_s,
                       started_at_s=started_s, copies=built)


def view(*workers: WorkerState) -> ClusterView:
    return ClusterView.from_workers(workers)


def model(slug: str, size: int = GB, tp: int = 1, **kw) -> ModelSpec:
    return ModelSpec(slug=slug, path=f"/models/{slug}", parameter_bytes=size, tensor_parallel_size=tp, **kw)


def forecast(slug: str, avg: float, peak: float, upper: float | None = None, method: str = "naive") -> Forecast:
    return Forecast(model=slug, window_start_s=0, window_s=300, predicted_avg=avg, predicted_peak=peak,
                    predicted_peak_upper=peak if upper is None else upper, method=method, made_at_s=0)


def sample(slug: str, start_s: float, concurrency: float = 1.0, arrivals: int = 1, peak: int | None = None,
           gateway: str = "gw", interval_s: float = 1.0) -> DemandSample:
    return DemandSample(gateway_id=gateway, model=slug, start_s=start_s, interval_s=interval_s, arrivals=arrivals,
                        completions=arrivals, concurrency_avg=concurrency,
                        concurrency_peak=round(concurrency) if peak is None else peak)
