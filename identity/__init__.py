"""Identity: the identifier graph, resolution rules, stable profiles and privacy."""
