"""kfac_optimizer_discard_statistics through Optimizer.discard_statistics (issue 15)."""
import numpy as np

import libkfac as kfac


def test_discard_statistics_drops_pending_rows_only():
    rng = np.random.default_rng(15)
    x, g = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    with kfac.Optimizer(np.float64) as opt, kfac.Optimizer(np.float64) as twin:
        for o in (opt, twin):
            layer = o.add_dense(3, 2)
            o.record_inputs(layer, x)
            o.record_output_grads(layer, g)
            o.update_factors()
        opt.record_inputs(layer, 100 * x)  # pending on opt only
        opt.discard_statistics()
        assert opt.state_bytes() == twin.state_bytes()
        opt.discard_statistics()  # nothing pending: still fine
        assert opt.state_bytes() == twin.state_bytes()
