"""Bytes in, a 28x28 MNIST image out: the decode plan and its budget, the MNIST preprocessing
recipe and native-memory housekeeping. No Flask, no model.
"""
