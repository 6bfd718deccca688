"""The pure-torch core: every measure as a function of a module and a probe batch. Never imports Lightning.

One module per mathematical object: the model as a function (:mod:`.functional_model`), its traced forward
pass (:mod:`.tracing`), the layer kinds the engines understand (:mod:`.layer_kinds`); the rank over GF(p)
(:mod:`.finite_field`), the floating-point numerical rank (:mod:`.rank`); the dimension engines: exact
(:mod:`.exact`), float Gram from per-layer factors (:mod:`.gram`), dense Jacobian (:mod:`.jacobian`), and the
measure that chooses between them (:mod:`.dimension`); bounds from symmetries (:mod:`.symmetries`); activation
patterns and linear regions (:mod:`.activation_patterns`); the CFFD (:mod:`.cffd`); flatness from Hessian-vector
products (:mod:`.hessian`, :mod:`.lanczos`, :mod:`.trace_estimation`, :mod:`.flatness`); neuron alignment
(:mod:`.alignment`); memory budgets (:mod:`.memory`) and errors (:mod:`.errors`).
"""
