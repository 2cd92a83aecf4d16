"""Health: each endpoint's verdict and why, and which verdicts are admitted (quorum, mass-failure guard),
kept across restarts (SQLite) and raised as alarms. The first stage after the topology.
"""
