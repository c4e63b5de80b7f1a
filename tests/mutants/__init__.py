"""The mutation suite of the verification gate (table.py, driver.py; nox -s mutants)."""
