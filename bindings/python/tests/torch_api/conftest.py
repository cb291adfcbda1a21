"""The PyTorch tests: skipped as a whole when torch is not installed (the one skip rule)."""

import pytest

pytest.importorskip("torch")
