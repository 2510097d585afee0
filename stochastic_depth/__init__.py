"""Tools around the models of ``resnet_with_stochastic_depth`` (installed with it).

Modules, each imported on its own, the base first:

``gate``
    The ``StochasticDepth`` gate, survival rules, ``set_step`` and the gates' state
    (torch only; the model file re-exports all of it).
``schedules``
    Schedules of the gates' ``drop_scale``: ``linear_drop_warmup``, ``early_drops``,
    ``late_drops``.
``library_blocks``
    Converts torchvision's ConvNeXt, Swin and EfficientNet blocks and timm's ViT,
    ConvNeXt and ResNet blocks; ``add_stochastic_depth`` calls it.
``compilation``
    ``compile_branches``: regional ``torch.compile`` of the residual branches, any family.
``counting``
    FLOP floors and operator counts of a training step.
``distributed``
    FSDP2 sharding in which a dropped branch is neither all-gathered nor
    reduce-scattered (``fully_shard_stochastic_depth``), and DDP (``data_parallel``).
``evaluation_network``
    Evaluating a trained network with a subset of its blocks, and recomputing its
    BatchNorm statistics.
"""
