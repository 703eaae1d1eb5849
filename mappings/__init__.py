"""Not code: this file lets the installed package ``connector._assets`` be this folder (see pyproject.toml).

peersync reads the shipped profiles, terminology and US Core resources here through ``connector.assets``.
"""
