"""Routing statistics: tables, metrics, plots and reports."""
