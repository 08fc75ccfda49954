"""The OMICard option bits, named exactly as in appendix A of the ITPison manual.

The names are kept verbatim (typos included: ``cJBConverTextToHTMLMask``) so a
customer can search the manual for any name Postlane reports back.
"""

from __future__ import annotations

from typing import Final

LAUNCH_OPTION: Final = {
    1: "cLHRemoveFilesAfterCompleteOption",
    2: "cLHRemoveDataAfterCompleteOption",
    4: "cLHPendApproveOption",
    8: "cLHAutoGenRefNumberOption",
    16: "cLHProcessSubListOption",
    32: "cLHNotCreateJobFolderOption",
    64: "cLHNotCreateLaunchFolderOption",
    128: "cLHCreateJobOption",
    256: "cLHMLContentSampleListOption",
    512: "cLHCheckExtTimeOption",
    1024: "cLHCheckListOption",
}

JOB_OPTION: Final = {
    1: "cJBDoResendMask",
    2: "cJBActiveContentMask",
    4: "cJBCreateReportMask",
    8: "cJBConvertHtmlToTextFormat",
    16: "cJBDynaMergeMask",
    32: "cJBMergeDelMask",
    64: "cJBProcessOptionMask",
    128: "cJBBackupSendMessage",
    256: "cJBAuditSendMessage",
    512: "cJBConvertContentToUTF8Mask",
    1024: "cJBAddContentLocationToHtml",
    2048: "cJBGetSubjectFromHTMLTitleMask",
    8192: "cJBAutoAdjustCharSetToContentCharSet",
    16384: "cJBAutoAdjustHeaderCharSetToContentCharSet",
    32768: "cJBLandSameWebFolderOnly",
    131072: "cJBAutoGetLandPageMask",
    262144: "cJBConverTextToHTMLMask",
    1048576: "cJBAddExternRefToEmailMask",
    2097152: "cJBSaveWebPageAsMht",
    134217728: "cJBHtmlExtElementMask",
    268435456: "cJBAddOutlookDeliveryReceiptMask",
    536870912: "cJBAddOutlookReadReceiptMask",
    2147483648: "cJBRemoveFilesAfterComplete",
}

LINK_OPTION: Final = {
    1: "cLKConvertExtLinkToIntResource",
    2: "cLKAddQStrToLinkMask",
    4: "cLKKeepDuplicateLinkMask",
    8: "cLKAutoCleanLink",
    16: "cLKAddBaseToUrl",
    32: "cLKAutoGetLinkNameFromTextMask",
    64: "cLKNotTrackOpenMask",
    128: "cLKNotTrackAllLinkMask",
    256: "cLKTrackNameLinkOnlyMask",
    512: "cLKNotTrackMailToLinkMask",
    1024: "cLKTrackFrameLinkMask",
    2048: "cLKNotTrackMMSMask",
    4096: "cLKNotConvertMMSMask",
    8192: "cLKNotConvertImageAsOpenLinkMask",
    16384: "cLKTrackQRCodeLinkMask",
}

LIST_OPTION: Final = {
    1: "cLTKeepToHeader",
    2: "cLTKeepCcHeader",
    8: "cLTAutoAdjustInvalidList",
    16: "cLTNoLineEsc",
    32: "cLTRemoveUnsubMask",
    64: "cLTRemoveDupMask",
    128: "cLTRemoveBlackMask",
    256: "cLTRemoveWhiteMask",
    512: "cLTRemoveReturnMask",
    1024: "cLTSampleListOnly",
    2048: "cLTSampleAndSendAll",
    4096: "cLTCheckListFileTypeFromListContent",
    8192: "cLTNotExpandToAddress",
    16384: "cLTNotExpandCcAddress",
    32768: "cLTNotExpandBccAddress",
    65536: "cLTBypassAllListProcessFilter",
    131072: "cLTRemoveDeliverMask",
    262144: "cLTRemoveResponseMask",
    524288: "cLTNotToRemoveSystemBlackMask",
    1048576: "cLTNotToRemoveSystemRemoveWhiteMask",
}

#: SendOption is not a set of bits: its low four bits (cSDSendListMask=15)
#: hold one of these values.
SEND_LIST_MASK: Final = 15
SEND_OPTION: Final = {
    0: "cSDSendMainListOnly",
    1: "cSDSendMainListFirst",
    2: "cSDSendSubListFirst",
    3: "cSDSendSubListOnly",
    4: "cSDSendBothList",
}
