"""rpicluster.train"""
