"""Layer fitting on calibration captures: one MoE layer at a time, the model run by `runtime/`.

    measured.py     calibration session (load_calibration), measure_layer: capture, search
                    (or fixed kept ids, kept=), fit
    lanes.py        the layered run: lanes of windows, each seeing a differently modified model
    reference.py    the unmodified residuals after each MoE layer, recorded during another pass
    override.py     an in-memory model behaving like its pruned checkpoint, layer by layer
    replay.py       one MoE layer replayed on cached tokens with experts removed
    search.py       beam search over removal sets by measured damage
    incremental.py  the search's D(S + e) from the state of S under local routing
    compensate.py   closed-form ridge refit of the kept experts' down projections
    refit_stats.py  the down refit from streamed sufficient statistics
    refit_stream.py streaming the refit's tokens through one materialised layer
    reconstruct.py  all projections of the kept experts, fitted together
    router_fit.py   Gauss-Newton refit of the kept router rows
    tokens.py       the calibration token budget (positions that fit beside the weights)
    estimate.py     a calibrated run's time and memory, predicted from a probe of one layer
    compute.py      multiply-adds of a forward and of a reconstruction step (its step budget)

Imports `runtime/`, `calib/`, `families/`, `surgery/` and lower floors; see docs/architecture.md.
"""
