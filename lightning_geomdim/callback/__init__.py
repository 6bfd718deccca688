"""The Lightning layer: the :class:`GeometryMonitor` callback (:mod:`.monitor`, its hooks) and its helpers, one
concern each: argument checks (:mod:`.validation`); probe batches drawn from the trainer's data (:mod:`.probes`,
:mod:`.probe_set`); when to measure and the time budget (:mod:`.schedule`); one measurement step per probe, calling
the core (:mod:`.measures`); the observer guarantee (:mod:`.observer`); the ``on_error`` policy
(:mod:`.error_policy`); what is logged (:mod:`.log`) and the TensorBoard extras (:mod:`.tensorboard`); several
processes (:mod:`.distributed`)."""
