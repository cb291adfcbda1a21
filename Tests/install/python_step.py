"""Install check of the Python route: run from a directory outside the checkout with only the
installed package (no KFAC_LIBRARY). Imports libkfac, checks where the library was loaded from,
and takes training steps with numpy (and with PyTorch when it is importable). Usage:
    python python_step.py bundled|checkout
bundled: the library must be the copy inside the installed package; checkout: an editable
install, the library must be the checkout's .build/release/libkfac.so."""

import os
import sys

import numpy as np

import libkfac

expected = sys.argv[1] if len(sys.argv) > 1 else "bundled"
assert "KFAC_LIBRARY" not in os.environ, "the install check must run without KFAC_LIBRARY"
package_dir = os.path.dirname(os.path.abspath(libkfac.__file__))
if expected == "bundled":
    assert libkfac.library_path == os.path.join(package_dir, "libkfac.so"), libkfac.library_path
else:
    assert libkfac.library_path.endswith(os.path.join(".build", "release", "libkfac.so")), libkfac.library_path
print(f"libkfac {libkfac.__version__} from {package_dir}, library {libkfac.library_path}")

# numpy: one dense layer, least squares on a random problem; the loss must go down.
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 8)).astype(np.float32)
y = x @ rng.standard_normal((8, 3)).astype(np.float32)
w = np.zeros((3, 8), np.float32)
b = np.zeros(3, np.float32)
losses = []
with libkfac.Optimizer(np.float32, damping=1e-2, kl_clip=0.0) as opt:
    layer = opt.add_dense(8, 3)
    for _ in range(5):
        residual = x @ w.T + b - y                       # per-example output gradients
        losses.append(0.5 * float((residual ** 2).sum()) / len(x))
        if opt.wants_statistics:
            opt.record_inputs(layer, x)
            opt.record_output_grads(layer, residual)
        dw, db = residual.T @ x / len(x), residual.mean(axis=0)  # of the mean loss
        opt.step([dw], [db])
        w -= 0.2 * dw
        b -= 0.2 * db
print("numpy losses", " ".join(f"{loss:.4f}" for loss in losses))
assert losses[-1] < 0.9 * losses[0], losses

try:
    import torch
except ImportError:
    print("torch not installed: PyTorch step skipped")
    sys.exit(0)

from libkfac.torch import KFACPreconditioner

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
preconditioner = KFACPreconditioner(model, lr=0.1, damping=1e-2)
sgd = torch.optim.SGD(model.parameters(), lr=0.1)
inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
losses = []
for _ in range(5):
    sgd.zero_grad()
    loss = torch.nn.functional.mse_loss(model(inputs), targets)
    loss.backward()
    preconditioner.step()
    sgd.step()
    losses.append(loss.item())
print("torch losses", " ".join(f"{loss:.4f}" for loss in losses))
assert preconditioner.steps == 5 and losses[-1] < losses[0], losses
