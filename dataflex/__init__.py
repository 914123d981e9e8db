"""dataflex: training that chooses its own data.

The core (this package's modules except ``dataflex.hf``) imports only torch and numpy. The Trainer
callback is loaded lazily so ``import dataflex`` stays light::

    from dataflex import DataFlexCallback
    from dataflex.policies import ODM
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from dataflex.hf.callbacks import DataFlexCallback, DataFlexCurriculumCallback, DataFlexSelectCallback

_HF_NAMES = ("DataFlexCallback", "DataFlexSelectCallback", "DataFlexCurriculumCallback")


def __getattr__(name: str) -> Any:
    if name in _HF_NAMES:
        try:
            import dataflex.hf as hf
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"{name} needs `transformers`; install it with `pip install dataflex` (core deps)"
            ) from err
        return getattr(hf, name)
    raise AttributeError(f"module 'dataflex' has no attribute {name!r}")


__all__ = ["DataFlexCallback", "DataFlexCurriculumCallback", "DataFlexSelectCallback", "__version__"]
