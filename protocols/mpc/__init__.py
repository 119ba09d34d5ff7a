"""Multi-institution private calibration on CrypTen (LPM paper Fig. 9, distributed calibration).

Institutions secret-share their private daily counts among all parties; the coordinator
learns only the calibration loss and its gradient w.r.t. θ. See ``docs/mpc.md``.
"""
