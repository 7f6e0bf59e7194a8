"""The driver at scale, simulated: sweeps of hundreds of report-only trials on a multi-node Ray cluster."""
