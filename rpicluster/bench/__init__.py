"""rpicluster.bench"""
