"""The way back from the clinic and community organizations (``peersync pull``).

Three flows, each read from the FHIR server and written to the program's side, never logged:

* :mod:`.inbound`: referrals the clinic sends to the program (Tasks owned by the program's Organization) become
  rows of an intake file (:mod:`.intake`, PHI: 0600), and each Task moves to ``received``;
* :mod:`.community`: the status community organizations set on the referral Tasks peersync wrote;
* :mod:`.clinical`: the latest HbA1c and blood pressure and upcoming appointments, only for participants whose
  enrollment records consent.

Parsing and decisions are pure functions (these modules); :mod:`.puller` does the I/O.
"""
