"""portwatch: host network anomaly detector (XDP counters, SQLite rounds, CNN-LSTM autoencoder)."""
__version__ = "0.1.0"
