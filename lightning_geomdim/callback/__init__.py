"""The Lightning layer: the :class:`GeometryMonitor` callback (:mod:`.monitor`) and its helpers: probe batches
drawn from the trainer's data (:mod:`.probes`), the schedule and overhead budget (:mod:`.schedule`), logging to
TensorBoard and any Lightning logger (:mod:`.tensorboard`)."""
