"""rpicluster.models"""
