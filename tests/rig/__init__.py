"""Test rig: private Postfix, zone DNS server, scriptable SMTP upstream, clients, runners.

Everything here runs on loopback with free ports so tests never touch real mail or DNS.
"""
