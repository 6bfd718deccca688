"""The pure-torch core: every measure as a function of a module and a probe batch. Never imports Lightning.

One module per mathematical object: the model as a function (:mod:`.functional_model`), its one traced forward
pass over a probe, shared by every measure of a step (:mod:`.probe_trace`, with :mod:`.tracing`), the layer kinds
the engines understand (:mod:`.layer_kinds`); GF(p) (:mod:`.finite_field`) and ranks over it (:mod:`.rank_mod_p`,
:mod:`.symmetric_rank_mod_p`), the floating-point numerical rank (:mod:`.rank`); the dimension engines: exact
(:mod:`.exact`, its program :mod:`.exact_program`), the float Gram from per-layer factors (:mod:`.gram`, with the
plan :mod:`.gram_plan`, the structural conditions :mod:`.structure`, the layers' forms :mod:`.factor_forms`, their
check by one backward :mod:`.factor_check` and the factors :mod:`.layer_factors`), the
dense Jacobian (:mod:`.jacobian`), the measure that chooses between them (:mod:`.dimension`) and per-block ranks
(:mod:`.blocks`); bounds from
symmetries (:mod:`.symmetries`); activation patterns and linear regions (:mod:`.activation_patterns`); the CFFD
(:mod:`.cffd`); flatness from Hessian-vector products (:mod:`.hessian`, :mod:`.lanczos`, :mod:`.trace_estimation`,
:mod:`.losses`, :mod:`.flatness`, its memory :mod:`.flatness_memory`); neuron alignment (:mod:`.alignment`); memory
budgets (:mod:`.memory`) and estimates from one sample (:mod:`.preflight`); stopping between chunks of work, on
SIGTERM or a time allowance (:mod:`.interrupt`); errors (:mod:`.errors`).
"""
