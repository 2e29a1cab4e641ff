"""The privacy ledger's API for the rest of taskvec: entries and their verification (`entries`), accounting
(`accounting`), the mechanisms' entry builders (`mechanisms`), merge budgets (`budget`) and release records
(`releases`), importable from here in one place."""

from taskvec.io.schema import LEDGER_FIELDS, RELATIONS, UNITS, LedgerEntry
from taskvec.privacy.accounting import (
    ANALYTIC_GAUSSIAN,
    DP_SGD_ACCOUNTANTS,
    GDP_COMPOSITION,
    MAX_PRV_POINTS,
    PRV,
    RDP,
    RDP_LARGE,
    accountant_epsilon,
    composed_noise_multiplier,
    dp_sgd_epsilon,
    gaussian_epsilon,
    gaussian_noise_multiplier,
    history_epsilon,
    prv_grid_points,
)
from taskvec.privacy.budget import BASIC_COMPOSITION, PrivacyBudget, check_merge_budget
from taskvec.privacy.entries import (
    EPSILON_TOLERANCE,
    best_guarantee,
    covers,
    name_model,
    summarize_ledger,
    validate_ledger,
    verify_ledger,
)
from taskvec.privacy.mechanisms.dp_sgd import dp_sgd_entry
from taskvec.privacy.mechanisms.gaussian_output import gaussian_output_entries, remaining_noise_multiplier
from taskvec.privacy.releases import RELEASES_FILE, locked_releases, read_releases, record_release, releases_path

__all__ = [
    "ANALYTIC_GAUSSIAN", "BASIC_COMPOSITION", "DP_SGD_ACCOUNTANTS", "EPSILON_TOLERANCE", "GDP_COMPOSITION",
    "LEDGER_FIELDS", "LedgerEntry", "MAX_PRV_POINTS", "PRV", "RDP", "RDP_LARGE", "RELATIONS", "RELEASES_FILE", "UNITS",
    "PrivacyBudget", "accountant_epsilon", "best_guarantee", "check_merge_budget", "composed_noise_multiplier",
    "covers", "dp_sgd_entry", "dp_sgd_epsilon", "gaussian_epsilon", "gaussian_noise_multiplier",
    "gaussian_output_entries", "history_epsilon", "locked_releases", "name_model", "prv_grid_points",
    "read_releases", "record_release", "releases_path", "remaining_noise_multiplier", "summarize_ledger",
    "validate_ledger", "verify_ledger",
]
