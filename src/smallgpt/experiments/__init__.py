"""Looking at runs: loss curves (`plot`), spreadsheets (`export-metrics`), and sweeps (`compare`)."""
