"""Protocol-faithful local stand-ins for the servers crm-mail talks to.

Each server listens on a real socket on 127.0.0.1, speaks the real protocol, and can
inject named faults. They exist so that the real smtplib, msal and exchangelib are
exercised over the network, never mocked.
"""
