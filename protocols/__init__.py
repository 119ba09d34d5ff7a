"""Cryptographic protocols: fixed-point ring, secret sharing, keys, sealed envelopes,
secure aggregation, secure neighbourhood sum, wire schemas and CrypTen-backed MPC.

Transport-agnostic state machines: no Flower imports here.
"""
