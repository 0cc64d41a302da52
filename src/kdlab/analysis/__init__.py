"""kdlab.analysis: power-law fits and teacher-hacking detectors over evaluation curves.

Reads metrics files and run directories only; never imports training code (pipeline, models,
losses), so it runs anywhere the metrics can be copied to.
"""

from kdlab.analysis.detectors import (
    GoldenConfig,
    GoldenVerdict,
    ProxyDeviationConfig,
    ProxyVerdict,
    detect_golden,
    detect_proxy_deviation,
    scatter_log_sigma,
)
from kdlab.analysis.loading import Metrics, MetricsError, load_metrics
from kdlab.analysis.powerlaw import PowerLawFit, fit_power_law
from kdlab.analysis.runs import RunAnalysis, analyse, analyse_run, analyse_sweep, find_runs

__all__ = [
    "GoldenConfig",
    "GoldenVerdict",
    "Metrics",
    "MetricsError",
    "PowerLawFit",
    "ProxyDeviationConfig",
    "ProxyVerdict",
    "RunAnalysis",
    "analyse",
    "analyse_run",
    "analyse_sweep",
    "detect_golden",
    "detect_proxy_deviation",
    "find_runs",
    "fit_power_law",
    "load_metrics",
    "scatter_log_sigma",
]
