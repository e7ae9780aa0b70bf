"""Shared test set-up: import the project from the repository root, silence progress bars."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("EP_NO_PROGRESS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as main.py sets it for itself
