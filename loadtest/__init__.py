"""The load tester: generator, runner and sweep, report and plots. No Prefect here."""
