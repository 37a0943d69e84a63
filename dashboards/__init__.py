"""Dashboards: KPI definitions, standard and custom dashboards, the web pages."""
