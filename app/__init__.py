"""portwatch, a host network anomaly detector: entry points (__main__, cli, port_collector, port_detector),
config and errors here. Nothing imports an entry point; config.py and errors.py may be imported by every layer."""
__version__ = "0.1.0"
