"""Locust load tests: HTTP ranking users, a gRPC lookup user, step shapes, served AUC, the report."""
