"""Expert-, sequence- and data-parallel execution of the MoE video DiT over N ranks.

One DiT replica is a group of ``N`` ranks joined in a ``torch.distributed`` group (NCCL on
GPU, gloo on CPU). Every rank holds all non-expert weights and its share of the experts
(``placement``), read as slices of the same safetensors checkpoint (``loader``). The leader
(rank 0) owns the batch: each step it broadcasts a ``StepPlan`` (``plan``); every rank runs its
part (``worker``): rows split across ranks (data parallel) or one long sequence split across
ranks with Ulysses attention (``sequence``); MoE layers dispatch tokens to the experts' ranks
and back with variable-size all-to-all (``expert``). ``proxy.ParallelModel`` puts the group
behind the single-model interface ``dit_worker.engine.DiTEngine`` drives, so continuous
batching, seeds, previews and aborts work unchanged.

Nothing here imports Ray: transports (Ray actors in ``services``, processes in tests) plug in
through ``proxy.Transport``.
"""
