"""The hook through which a finished run is published to the Hub: hf_ddpm/hub.py implements it."""

from ..hub import check_publish, publish

__all__ = ["check_publish", "publish"]
