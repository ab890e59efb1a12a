"""Tests of the hsmkeys console script."""
