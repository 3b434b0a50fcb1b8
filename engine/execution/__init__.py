"""Execution: the loaded model (`LoadedModel`), the per-step attention metadata and the model
runner that turns a `SchedulerOutput` into one forward pass (models, layers and kernels live
beside this package, in engine/models, engine/layers and engine/kernels)."""
