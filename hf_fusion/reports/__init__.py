"""Evaluation reports and what is made from them: leaderboards (Markdown, CSV, the Space's table) and plots."""
