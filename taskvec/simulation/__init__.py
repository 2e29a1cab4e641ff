"""Simulation: split one data set into sites, fine-tune each, export, merge, compare with single sites and
centralised training, and report (tables, plots); synthetic data for the demo.

Top layer of the library: may import every other package of `taskvec`, never `taskvec.cli` or
`taskvec.registry`.
"""
