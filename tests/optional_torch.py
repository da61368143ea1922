"""``torch`` for tests that also run in the torch-free compat lane (``make test-compat``).

With torch installed this is torch itself. Without it, it is a stand-in whose every attribute skips the
*current test* ("needs torch"), so a test's numpy half runs everywhere and its torch half only where torch
is installed. Use it lazily (inside tests or lambdas), never at collection time.
"""
import pytest

try:
    import torch
except ImportError:  # pragma: no cover - exercised by the compat lane

    class _NoTorch:
        def __getattr__(self, name):
            if name.startswith("__"):  # pytest's collection probes module attributes: not a use of torch
                raise AttributeError(name)
            pytest.skip("needs torch (the fkdstore[torch] extra)")

        def __bool__(self):
            return False

    torch = _NoTorch()

HAVE_TORCH = bool(torch)


def cuda_available() -> bool:
    return HAVE_TORCH and torch.cuda.is_available()
