"""rpicluster.deploy"""
