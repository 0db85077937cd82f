"""rpicluster.dashboard"""
