"""The fleet: many hosts sharing one blocklist (CrowdSec LAPI, crowdsec.py) and one model (Flower).

crowdsec.py and lapi.py use the standard library only and are on the collector's path; the Flower
modules import ``flwr`` (and the model, TensorFlow) and are never imported by the collector.
"""
