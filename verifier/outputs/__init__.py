"""What a run writes and shows: results.json, Markdown/HTML, JUnit, plots, console, progress."""
